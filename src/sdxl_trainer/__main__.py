from sdxl_trainer.main import main

raise SystemExit(main())
