from rareaug.samples import build_defect_sample, build_fashion_sample, build_texture_sample

build_texture_sample()
build_defect_sample()
build_fashion_sample()
