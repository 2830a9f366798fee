#!/bin/sh
# No init system in these containers: packages must not try to start services.
exit 101
