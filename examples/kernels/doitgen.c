#include "common.h"
#define NR 140
#define NQ 150
#define NP 160
static double A[NR][NQ][NP], C4[NP][NP], sum[NP];
int main(void) {
    for (int r = 0; r < NR; r++) for (int q = 0; q < NQ; q++) for (int p = 0; p < NP; p++)
        A[r][q][p] = (double)((r * q + p) % NP) / NP;
    for (int i = 0; i < NP; i++) for (int j = 0; j < NP; j++) C4[i][j] = (double)(i * j % NP) / NP;
    for (int r = 0; r < NR; r++)
        for (int q = 0; q < NQ; q++) {
            for (int p = 0; p < NP; p++) {
                sum[p] = 0.0;
                for (int s = 0; s < NP; s++) sum[p] += A[r][q][s] * C4[s][p];
            }
            for (int p = 0; p < NP; p++) A[r][q][p] = sum[p];
        }
    print_checksum("doitgen", &A[0][0][0], (long)NR * NQ * NP);
    return 0;
}
