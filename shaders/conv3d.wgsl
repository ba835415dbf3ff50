// conv3d kernels
