"""The app each ``uvicorn --workers`` child imports: ``uvicorn reliability.workers_app:app``.

The example named by ``RELIABILITY_FRAMEWORK`` (imported as ``uvicorn app:app`` would, with
the ``DATABASE_*`` environment), its harness route mounted and wrapped in the leak-reporting
:class:`~reliability.serve.Harness`, exactly as ``python -m reliability.serve`` serves it. The
tables are created beforehand (``python -m reliability.serve --create``), not by each worker.
"""

import os

from .serve import Harness, load_example, mount

_example = load_example(os.environ["RELIABILITY_FRAMEWORK"])
mount(_example.app, _example.db)
app = Harness(_example.app, _example.db)
