from .trainer import exit_process, main

exit_process(main())
