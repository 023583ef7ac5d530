"""Model files (the bottom layer): external data checked before it is read, reading a model with its large
weights left in the file, and writing models and reports atomically (external data above 2 GiB).

Takes paths and ModelProtos; gives ModelProtos, weight-free copies and files on disk. Imports no stage.
"""
