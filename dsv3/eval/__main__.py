"""``python -m dsv3.eval --checkpoint DIR --tasks ppl,cloze --out DIR``."""
import sys

from dsv3.eval.cli import main

sys.exit(main())
