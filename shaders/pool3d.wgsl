// pool3d kernels
