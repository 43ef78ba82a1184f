import sys

from evolver_kernels.merge.cli import main

sys.exit(main())
