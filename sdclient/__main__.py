"""``python -m sdclient``: the command line of sdclient/client.py."""

import sys

from sdclient.client import main

sys.exit(main())
