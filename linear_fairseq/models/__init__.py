try:
    import fairseq  # noqa: F401
except ModuleNotFoundError as err:
    if err.name != "fairseq":
        raise
    raise ModuleNotFoundError(
        "linear_fairseq's models need fairseq, which pip does not install with it (its declared "
        "torchaudio would pull a second torch): pip install --no-deps ve-fairseq==0.12.3, or run "
        "scripts/setup.sh (README, Installation)",
        name="fairseq",
    ) from None
