from packds.cli import main

raise SystemExit(main())
