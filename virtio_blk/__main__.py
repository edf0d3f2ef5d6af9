"""``python -m virtio_blk`` is the ``vhost-user-blk`` command."""

import sys

from .cli import main

sys.exit(main())
