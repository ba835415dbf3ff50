// softmax kernels
