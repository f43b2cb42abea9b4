"""`python -m mlx_gemma3n.generate`: see `mlx_gemma3n.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
