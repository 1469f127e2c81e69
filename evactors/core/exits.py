"""Process exit codes: the contract with systemd, supervisord and scripts (README).

``0`` a clean stop, ``1`` a fatal fault (an actor kept crashing, a part would not start),
``2`` a configuration error naming the setting, ``3`` no running service where a command
needs one (``status``, ``remap``)."""

from __future__ import annotations

EXIT_OK, EXIT_FATAL, EXIT_CONFIG, EXIT_NO_SERVICE = 0, 1, 2, 3
