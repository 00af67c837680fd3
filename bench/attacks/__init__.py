"""The adversarial part of `prunefleet bench reliability`: a fleet's own members, and whoever holds one
of its certificates, trying to do harm against real processes on loopback (`bench.attacks.run`)."""
