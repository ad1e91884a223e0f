# Imported at start-up by every Python subprocess of the tests (tests/conftest.py puts this
# folder on PYTHONPATH): the network guard of cotexnet_netguard.py, in the child too.
import cotexnet_netguard

cotexnet_netguard.install()
