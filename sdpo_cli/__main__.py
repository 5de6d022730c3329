"""Run as: python -m sdpo_cli <command> CONFIG [key=value ...] (also under `accelerate launch -m sdpo_cli`)."""

from sdpo_cli.cli import main

if __name__ == "__main__":
    main()
