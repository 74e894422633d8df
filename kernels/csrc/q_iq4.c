/* IQ4_NL, IQ4_XS: not yet implemented in this build (the table is empty, so the Python layer
 * reports these formats as having no kernel). */
#include "moeplan.h"

const mp_format mp_formats_iq4[] = {
    MP_FORMAT_END,
};
