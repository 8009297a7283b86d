#!/bin/sh
# ACPI power button handler of the lume test guest.
# Installed as /etc/acpi/PWRF/00000080: busybox acpid maps the evdev
# KEY_POWER press to "button/power PWRF 00000080" -> action PWRF/00000080
# (relative to its -c dir) and runs this file.
export PATH=/bin
echo "LUME-GUEST: powering off" >/dev/console
sync
poweroff -f
