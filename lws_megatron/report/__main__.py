import sys

from lws_megatron.report import main

sys.exit(main())
