"""Chapter 0, the plumbing every other folder uses; it imports nothing else of minillm.

    fileio.py   atomic writes (temp file, fsync, rename), the disk-full error, the one JSON reader
    strict.py   the one type check of config values read from files and flags
    device.py   the one device / dtype picker
    cli.py      the shared argument parser and the one-line `error: ...` for a user's mistake
"""
