import sys

from hsm.commands.main import main

sys.exit(main())
