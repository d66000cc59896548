"""Model families: each is one file of units plus a denoiser call (see base.Family)."""
