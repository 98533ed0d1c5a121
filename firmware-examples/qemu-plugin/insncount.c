/*
 * Exact executed-instruction counts between two marker functions, as a QEMU
 * TCG plugin (API version 1, QEMU 7.2). Debian's QEMU accepts -plugin but
 * ships no plugins and no qemu-plugin.h, so the few declarations used are
 * written out below.
 *
 * Usage: -plugin ./libinsncount.so,start=0xADDR,end=0xADDR,out=FILE[,profile=FILE]
 * Every execution of the translation block at `start` opens an interval;
 * the block at `end` closes it and appends the interval's instruction count
 * (one decimal per line) to FILE. With `profile=`, each interval also appends
 * a line `interval N` and one line `ADDR INSNS` per translation block that ran
 * in it (a block translated twice appears twice; sum by address).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, qemu_plugin_vcpu_udata_cb_t cb,
                                          enum qemu_plugin_cb_flags flags, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);

__attribute__((visibility("default"))) int qemu_plugin_version = 1;

enum kind { BLOCK, START, END };
struct block { uint64_t n; enum kind kind; uint64_t pc; uint64_t executed; };

static uint64_t start_addr, end_addr, current;
static int counting;
static FILE *out, *profile;
static struct block **blocks;
static size_t n_blocks, cap_blocks;
static unsigned interval;

static void write_profile(void)
{
    fprintf(profile, "interval %u\n", interval);
    for (size_t i = 0; i < n_blocks; i++) {
        if (blocks[i]->executed) {
            fprintf(profile, "0x%llx %llu\n", (unsigned long long)blocks[i]->pc,
                    (unsigned long long)(blocks[i]->executed * blocks[i]->n));
            blocks[i]->executed = 0;
        }
    }
    fflush(profile);
}

static void on_exec(unsigned int vcpu, void *udata)
{
    struct block *b = udata;
    (void)vcpu;
    if (b->kind == START) {
        counting = 1;
        current = 0;
    } else if (b->kind == END) {
        if (counting && out) {
            fprintf(out, "%llu\n", (unsigned long long)current);
            fflush(out);
            if (profile) {
                write_profile();
            }
            interval++;
        }
        counting = 0;
    } else if (counting) {
        current += b->n;
        b->executed++;
    }
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    struct block *b = malloc(sizeof *b);
    uint64_t pc = qemu_plugin_tb_vaddr(tb);
    (void)id;
    if (!b) {
        return;
    }
    b->n = qemu_plugin_tb_n_insns(tb);
    b->kind = pc == start_addr ? START : pc == end_addr ? END : BLOCK;
    b->pc = pc;
    b->executed = 0;
    if (profile) {
        if (n_blocks == cap_blocks) {
            size_t cap = cap_blocks ? 2 * cap_blocks : 1024;
            struct block **grown = realloc(blocks, cap * sizeof *grown);
            if (!grown) {
                return;
            }
            blocks = grown;
            cap_blocks = cap;
        }
        blocks[n_blocks++] = b;
    }
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, QEMU_PLUGIN_CB_NO_REGS, b);
}

__attribute__((visibility("default"))) int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                                               int argc, char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "start=", 6) == 0) {
            start_addr = strtoull(argv[i] + 6, NULL, 0);
        } else if (strncmp(argv[i], "end=", 4) == 0) {
            end_addr = strtoull(argv[i] + 4, NULL, 0);
        } else if (strncmp(argv[i], "out=", 4) == 0) {
            out = fopen(argv[i] + 4, "w");
        } else if (strncmp(argv[i], "profile=", 8) == 0) {
            profile = fopen(argv[i] + 8, "w");
        }
    }
    if (!start_addr || !end_addr || !out) {
        fprintf(stderr, "insncount: need start=, end= and out= arguments\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    return 0;
}
