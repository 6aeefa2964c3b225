"""The demo's training script: a small MLP on scikit-learn's digits, an ordinary PyTorch loop whose
only distributed line is the optimizer. Run it as a job:

    dcasgd launch --shards 2 --workers 4 --mode dcasgd-a -- python examples/train_digits.py

The code is ``dcasgd/train_digits.py`` (read it there, top to bottom): it ships inside the package,
so that ``dcasgd demo`` runs from an installed wheel (as ``python -m dcasgd.train_digits``), and this
script runs the same code, with the same options (``--help``).
"""

from dcasgd.train_digits import main

if __name__ == "__main__":
    main()
