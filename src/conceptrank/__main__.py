"""``python -m conceptrank``: the same command line as the ``conceptrank`` script."""

from conceptrank.cli import main

if __name__ == "__main__":
    main()
