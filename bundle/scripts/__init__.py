"""Bundle-local Python for brainsynth (TC-MGAN): only the pieces MONAI does not provide.

- ``scripts/runtime/``: what the configs import (``scripts.runtime.networks``, ``.trainer``, ``.inference``, ...);
- ``scripts/*.py``: command-line tools (phantom generator, datalist builder, benchmark, the whole study, figures,
  tables, MONAI Label export); no config uses them.
"""
