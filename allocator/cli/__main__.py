"""python -m moeplan.allocator.cli"""

import sys

from moeplan.allocator.cli import main

sys.exit(main())
