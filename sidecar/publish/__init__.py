"""The publish stage: everything a user looks at, written atomically from rendered images.

`files` writes each sample (image with A1111 infotext, and its `.txt`); `grids` the step's
contact sheet and `sidecar grid`; `gallery` the HTML page across steps; `tensorboard` the
images beside the trainer's loss curves; `step` all of a finished step's views at once.
"""
