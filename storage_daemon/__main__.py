"""``python -m storage_daemon`` is the ``vhost-user-blk`` command."""

import sys

from storage_daemon.cli import main

sys.exit(main())
