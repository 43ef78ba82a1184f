import sys

from evolver_kernels.evolve.cli import main

sys.exit(main())
