// conv_transpose3d kernels
