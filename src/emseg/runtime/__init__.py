"""Run-time infrastructure shared by every command: device, precision, threads, seeding, locks, DDP."""
