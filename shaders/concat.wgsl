// concat kernels
