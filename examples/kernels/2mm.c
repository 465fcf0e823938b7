#include "common.h"
#define NI 400
#define NJ 450
#define NK 500
#define NL 550
static double A[NI][NK], B[NK][NJ], C[NJ][NL], D[NI][NL], tmp[NI][NJ];
int main(void) {
    double alpha = 1.5, beta = 1.2;
    for (int i = 0; i < NI; i++) for (int k = 0; k < NK; k++) A[i][k] = (double)((i * k + 1) % NI) / NI;
    for (int k = 0; k < NK; k++) for (int j = 0; j < NJ; j++) B[k][j] = (double)(k * (j + 1) % NJ) / NJ;
    for (int j = 0; j < NJ; j++) for (int l = 0; l < NL; l++) C[j][l] = (double)((j * (l + 3) + 1) % NL) / NL;
    for (int i = 0; i < NI; i++) for (int l = 0; l < NL; l++) D[i][l] = (double)(i * (l + 2) % NK) / NK;
    for (int i = 0; i < NI; i++)
        for (int j = 0; j < NJ; j++) {
            tmp[i][j] = 0.0;
            for (int k = 0; k < NK; ++k) tmp[i][j] += alpha * A[i][k] * B[k][j];
        }
    for (int i = 0; i < NI; i++)
        for (int l = 0; l < NL; l++) {
            D[i][l] *= beta;
            for (int j = 0; j < NJ; ++j) D[i][l] += tmp[i][j] * C[j][l];
        }
    print_checksum("2mm", &D[0][0], (long)NI * NL);
    return 0;
}
