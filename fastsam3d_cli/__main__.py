"""`python -m fastsam3d_cli` (used by `torchrun -m fastsam3d_cli train ...`)."""
from fastsam3d_cli.cli import main

if __name__ == "__main__":
    main()
