"""``python -m factorial_tokens``: the ``factorial-tokens`` command."""

from factorial_tokens._cli import main

if __name__ == "__main__":
    main()
