from invnext.cli import main

raise SystemExit(main())
