import sys

from kms.cli import main

sys.exit(main())
