from export_lib.cli import main

raise SystemExit(main())
