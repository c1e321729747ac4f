"""``python -m factorial_tokens``: the ``factorial-tokens`` command (extra ``cli``)."""

from factorial_tokens.cli import main

if __name__ == "__main__":
    main()
