from dtop_export.cli import main

main()
