"""Entry point for ``mitmdump -s addon/entry.py --set rollouttap_store=runs.db``."""

from rollouttap.addon.capture import RolloutTap
from rollouttap.addon.fd_limit import FdLimit
from rollouttap.addon.listen_backlog import ListenBacklog
from rollouttap.addon.option_check import CheckDeferredOptions
from rollouttap.addon.tcp_tuning import TcpTuning

# The check last: see its module.
addons = [RolloutTap(), TcpTuning(), ListenBacklog(), FdLimit(), CheckDeferredOptions()]
