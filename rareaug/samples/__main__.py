from rareaug.samples import build_texture_sample

build_texture_sample()
