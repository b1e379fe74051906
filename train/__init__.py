"""train: the MixPro training application (`python -m train`); see train/README.md.

main (build + epochs) <- engine (the loop) <- losses (mix targets), checkpoint, optim, summary,
dist; config holds every knob. Nothing imports train/.
"""
