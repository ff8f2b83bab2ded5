import sys

from dinolab.cli.main import main

sys.exit(main())
