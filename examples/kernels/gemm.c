#include "common.h"
#define NI 700
#define NJ 750
#define NK 800
static double A[NI][NK], B[NK][NJ], C[NI][NJ];
int main(void) {
    double alpha = 1.5, beta = 1.2;
    for (int i = 0; i < NI; i++) for (int j = 0; j < NJ; j++) C[i][j] = (double)((i * j + 1) % NI) / NI;
    for (int i = 0; i < NI; i++) for (int k = 0; k < NK; k++) A[i][k] = (double)(i * (k + 1) % NK) / NK;
    for (int k = 0; k < NK; k++) for (int j = 0; j < NJ; j++) B[k][j] = (double)(k * (j + 2) % NJ) / NJ;
    for (int i = 0; i < NI; i++) {
        for (int j = 0; j < NJ; j++) C[i][j] *= beta;
        for (int k = 0; k < NK; k++)
            for (int j = 0; j < NJ; j++) C[i][j] += alpha * A[i][k] * B[k][j];
    }
    print_checksum("gemm", &C[0][0], (long)NI * NJ);
    return 0;
}
