"""The file suffixes of the model kinds dtop-export reads (``dtop_export.engines`` picks a runtime by them)."""

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
PLAN_SUFFIXES = (".plan", ".engine", ".trt")
IR_SUFFIXES = (".xml",)
PTE_SUFFIXES = (".pte",)
