/* kfac_factors.h - the numerical stages of K-FAC (Martens & Grosse 2015;
 * Grosse & Martens 2016 "KFC" for convolutions; Osawa et al. 2019 and
 * SP-NGD 2020), each callable on its own on host (CPU backend) arrays.
 * They are the CPU backend's K-FAC entries (kfac_backend.h) and the
 * reference the CUDA backend's are tested against; the optimizer that
 * sequences them through the backend table is kfac_precond.h.
 *
 * Conventions
 * - A layer's weight gradient dW is K x D row-major (K outputs; D inputs =
 *   KH*KW*C for a conv in KRSC order, C for FC), plus one column for a bias
 *   when the layer has one (D+1: the bias is the weight of an appended 1).
 * - Factors (KFC, spatially uncorrelated derivatives + homogeneity), for a
 *   batch of N images with T = HO*WO output locations and M = N*T rows:
 *       A = (1/M) sum_rows a a^T             a: im2col patch row (+ 1)
 *       G = N * sum_rows dy dy^T             dy: gradient of the MEAN loss
 *   i.e. G = (1/N) sum_n sum_t g g^T with per-sample gradients g = N dy,
 *   so that F ~= A (x) G (for FC, T = 1 and these are the usual K-FAC
 *   factors).
 * - Factors are stored packed: the upper triangle of an n x n symmetric
 *   matrix, element (i, j), i <= j, at index i + j*(j+1)/2 (LAPACK 'U'
 *   packed, column-major), n(n+1)/2 floats.
 * - Damping: with lambda = the job's damping and gamma = sqrt(lambda),
 *   pi = sqrt((tr A / dim A) / (tr G / dim G)) (Martens & Grosse's
 *   pi-correction), the damped factors are A + pi*gamma I and
 *   G + (gamma/pi) I.  The exact damped Kronecker inverse (eig path only)
 *   is 1 / (d_G d_A^T + lambda) in the eigenbases.
 * - Preconditioned gradient: P = (G + gamma/pi I)^-1 dW (A + pi gamma I)^-1.
 */
#ifndef KFAC_FACTORS_H
#define KFAC_FACTORS_H

#include <stddef.h>

#include "kfac/kfac_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

static inline size_t kfac_packed_len(int n) { return (size_t)n * (n + 1) / 2; }

/* full (n x n, symmetric, row-major) <-> packed upper triangle.  pack reads
 * only the lower triangle of `full` (its row j is packed column j). */
void kfac_pack_upper(int n, const float *full, float *packed);
void kfac_unpack_upper(int n, const float *packed, float *full);

/* Trace of a packed factor. */
double kfac_packed_trace(int n, const float *packed);

/* packed = scale * R^T R for R = rows (m x n, row-major), with, when
 * append_one is set, an extra last column of ones (packed is then of order
 * n+1).  Symmetric rank-k update (ssyrk; OpenBLAS threads it when called
 * outside an OpenMP region) into an n x n scratch matrix it allocates
 * itself (KFAC_ENOMEM if that fails). */
kfac_status kfac_gram_rows(kfac_backend *be, size_t m, int n, const float *rows, int append_one,
                           float scale, float *packed);

/* The same for the im2col patch rows of a convolution's input x (NHWC) with
 * geometry d: packed = scale * P^T P, P = patches (N*HO*WO x KH*KW*C [+1]),
 * computed in cache-sized chunks of rows over be->threads threads, each
 * into a private KD x KD partial summed in thread order (bitwise
 * reproducible for a fixed thread count).  ws: kfac_gram_patches_workspace
 * bytes (per thread: KD^2 floats + a chunk of >= 256 patch rows; 85 MB a
 * thread for a 3x3x512 conv), 8-byte aligned. */
size_t kfac_gram_patches_workspace(const kfac_backend *be, const kfac_conv_desc *d);
kfac_status kfac_gram_patches(kfac_backend *be, const kfac_conv_desc *d, const float *x,
                              int append_one, float scale, float *packed, void *ws);

/* running = decay * running + (1 - decay) * batch over len floats. */
void kfac_factor_average(size_t len, float *running, const float *batch, float decay);

/* Relative change ||new - old||_F / ||old||_F of two packed factors (off-
 * diagonal elements counted twice), for SP-NGD's adaptive refresh; from a
 * zero `old`: 0 if `new` is zero too, else INFINITY. */
double kfac_factor_change(int n, const float *old_packed, const float *new_packed);

/* pi = sqrt((tr A / na) / (tr G / ng)); 1 when either trace is not positive.
 * kfac_pi_from_traces takes the traces (from a backend's packed_trace). */
double kfac_pi_correction(int na, const float *a_packed, int ng, const float *g_packed);
double kfac_pi_from_traces(int na, double trace_a, int ng, double trace_g);

/* inv = (F + shift I)^-1 as a full symmetric n x n row-major matrix, by
 * Cholesky (LAPACKE spotrf + spotri, in place in inv, no allocation).
 * ws: n*n floats, reserved (the CPU path does not touch it).  Fails with
 * KFAC_EBACKEND (naming the order and the shift) if F + shift I is not
 * positive definite. */
kfac_status kfac_inverse_cholesky(int n, const float *packed, float shift, float *inv, float *ws);

/* Eigendecomposition of a packed factor (LAPACKE ssyevd, which allocates
 * its own ~2n^2-float workspace: KFAC_ENOMEM if it cannot): evals (n,
 * ascending, negatives clamped to 0) and evecs (n x n row-major, column j
 * the eigenvector of evals[j]). */
kfac_status kfac_eigh(int n, const float *packed, float *evals, float *evecs);

/* inv = Q diag(1 / (d + shift)) Q^T (full, row-major, exactly symmetric);
 * needs d + shift > 0.  No scratch: computed in strips with a stack tile. */
void kfac_inverse_from_eig(int n, const float *evals, const float *evecs, float shift,
                           float *inv);

/* out = Ginv * grad * Ainv; grad, out: k x d row-major; Ginv k x k, Ainv
 * d x d full; tmp: k*d floats.  out may alias grad (not tmp). */
void kfac_precondition(int k, int d, const float *ginv, const float *ainv, const float *grad,
                       float *out, float *tmp);

/* Exact damped Kronecker inverse in the eigenbases:
 *   V = QG^T grad QA;  V_ij /= (dG_i dA_j + lambda);  out = QG V QA^T.
 * tmp: k*d floats.  out may alias grad (not tmp). */
void kfac_precondition_eig_exact(int k, int d, const float *qg, const float *dg,
                                 const float *qa, const float *da, float lambda,
                                 const float *grad, float *out, float *tmp);

/* KL clipping (Osawa et al.): min(1, sqrt(kl_clip / (lr^2 * sum_pg))),
 * sum_pg = sum over layers of <preconditioned, raw gradient>; 1 when
 * sum_pg <= 0 or kl_clip <= 0 (clipping off). */
double kfac_kl_clip_scale(double kl_clip, double lr, double sum_pg);

/* Batch norm, unit-wise Fisher (SP-NGD): per channel j a 2x2 block over
 * (gamma_j, beta_j) from per-sample gradients sg (n x c: d loss_i/d gamma_j,
 * sum over locations, per-sample = N * mean-loss gradient) and sb (n x c):
 *   F_j = (1/n) sum_i [sg_ij sb_ij]^T [sg_ij sb_ij]
 * stored as fisher[3*j + {0,1,2}] = {F_gg, F_gb, F_bb}. */
void kfac_bn_unit_fisher(int n, int c, const float *sg, const float *sb, float *fisher);

/* Per-sample BN gradients of the first n images of a BN layer whose input,
 * output and output gradient x, y, dy hold per_image rows of c channels
 * per image: with g = grad_scale * dy (0 where relu and y <= 0),
 *   sg_ij = sum over image i's rows of g * (x - mean_j) * invstd_j,
 *   sb_ij = sum over image i's rows of g          (sg, sb: n x c). */
void kfac_bn_sample_grads(int n, size_t per_image, int c, const float *x, const float *y,
                          const float *dy, const float *save_mean, const float *save_invstd,
                          int relu, float grad_scale, float *sg, float *sb);

/* Per channel: [pg, pb] = (F_j + lambda I)^-1 [dg, db] (2x2 solve in
 * double; needs lambda > 0 where F_j is singular); with diagonal_only, the
 * off-diagonal F_gb is ignored.  Outputs may alias inputs. */
void kfac_bn_precondition(int c, const float *fisher, float lambda, int diagonal_only,
                          const float *dgamma, const float *dbeta, float *pgamma, float *pbeta);

#ifdef __cplusplus
}
#endif
#endif
