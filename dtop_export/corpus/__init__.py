"""Embedding a corpus and searching it: ``dtop-export embed -o FOLDER [--ray]``, ``index``, ``search``.

``source`` (SOURCE -> items: folders, path lists, Parquet/CSV tables, local or ``pyarrow.fs`` URIs), ``shards``
(the Parquet shard format, its manifest, resume checks, reading shards back), ``embed`` (the job, the shard
assembler and the in-process runner), ``ray_pipeline`` (the Ray Data runner) and ``index`` (faiss over the
shards, search). pyarrow, ray and faiss are imported inside the functions that use them.
"""
