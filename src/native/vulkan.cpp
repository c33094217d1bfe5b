// The Vulkan drivers on this machine, with what ggml-vulkan does not report: the driver's
// identity and version (VkPhysicalDeviceDriverProperties). pyllama decides per driver
// whether a feature is safe: Mesa's lavapipe before 25.0 corrupts memory when sampler
// chains are attached and detached (see pyllama.stream.driver_blocks_backend_sampling).
//
// The loader is opened at run time (dlopen), never linked: a Vulkan wheel must import,
// and fall back to the CPU, on a machine without one. Built with the Vulkan headers only
// in Vulkan builds (PYLLAMA_VULKAN_HEADERS); elsewhere the entry point says "unknown".

#include "pyllama_common.h"

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(PYLLAMA_VULKAN_HEADERS) && !defined(_WIN32)
#    define VK_NO_PROTOTYPES
#    include <vulkan/vulkan.h>
#    include <dlfcn.h>

namespace {

struct loader {
    void * handle = nullptr;
    ~loader() {
        if (handle) {
            dlclose(handle);
        }
    }
};

std::string version_string(uint32_t v) {
    return std::to_string(VK_API_VERSION_MAJOR(v)) + "." + std::to_string(VK_API_VERSION_MINOR(v)) + "." +
           std::to_string(VK_API_VERSION_PATCH(v));
}

// The drivers as a JSON list, or an empty string when no loader or instance is available.
std::string query() {
    loader lib;
    lib.handle = dlopen("libvulkan.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib.handle) {
        return "";
    }
    auto get_proc = reinterpret_cast<PFN_vkGetInstanceProcAddr>(dlsym(lib.handle, "vkGetInstanceProcAddr"));
    if (!get_proc) {
        return "";
    }
    auto create_instance = reinterpret_cast<PFN_vkCreateInstance>(get_proc(nullptr, "vkCreateInstance"));
    if (!create_instance) {
        return "";
    }
    VkApplicationInfo app{};
    app.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO;
    app.pApplicationName = "pyllama";
    app.apiVersion = VK_API_VERSION_1_2;  // VkPhysicalDeviceDriverProperties is core in 1.2
    VkInstanceCreateInfo info{};
    info.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO;
    info.pApplicationInfo = &app;
    VkInstance instance = VK_NULL_HANDLE;
    if (create_instance(&info, nullptr, &instance) != VK_SUCCESS) {
        return "";
    }
    auto destroy_instance = reinterpret_cast<PFN_vkDestroyInstance>(get_proc(instance, "vkDestroyInstance"));
    auto enumerate = reinterpret_cast<PFN_vkEnumeratePhysicalDevices>(get_proc(instance, "vkEnumeratePhysicalDevices"));
    auto properties = reinterpret_cast<PFN_vkGetPhysicalDeviceProperties>(
        get_proc(instance, "vkGetPhysicalDeviceProperties"));
    auto properties2 = reinterpret_cast<PFN_vkGetPhysicalDeviceProperties2>(
        get_proc(instance, "vkGetPhysicalDeviceProperties2"));
    nlohmann::json out = nlohmann::json::array();
    uint32_t n = 0;
    if (enumerate && properties && enumerate(instance, &n, nullptr) == VK_SUCCESS && n > 0) {
        std::vector<VkPhysicalDevice> devs(n);
        if (enumerate(instance, &n, devs.data()) == VK_SUCCESS) {
            for (uint32_t i = 0; i < n; ++i) {
                VkPhysicalDeviceProperties props{};
                properties(devs[i], &props);
                nlohmann::json d = {
                    {"index", i},
                    {"device_name", std::string(props.deviceName)},
                    {"api_version", version_string(props.apiVersion)},
                    {"min_storage_buffer_offset_alignment", props.limits.minStorageBufferOffsetAlignment},
                    {"driver_id", nullptr},
                    {"driver_name", nullptr},
                    {"driver_info", nullptr},
                };
                // a 1.0 device: vkGetPhysicalDeviceProperties2 may not take the 1.2 struct
                if (properties2 && props.apiVersion >= VK_API_VERSION_1_2) {
                    VkPhysicalDeviceDriverProperties driver{};
                    driver.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES;
                    VkPhysicalDeviceProperties2 props2{};
                    props2.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2;
                    props2.pNext = &driver;
                    properties2(devs[i], &props2);
                    d["driver_id"] = static_cast<int>(driver.driverID);
                    d["driver_name"] = std::string(driver.driverName, strnlen(driver.driverName, VK_MAX_DRIVER_NAME_SIZE));
                    d["driver_info"] = std::string(driver.driverInfo, strnlen(driver.driverInfo, VK_MAX_DRIVER_INFO_SIZE));
                }
                out.push_back(std::move(d));
            }
        }
    }
    if (destroy_instance) {
        destroy_instance(instance, nullptr);
    }
    return out.dump();
}

}  // namespace
#endif

// The machine's Vulkan physical devices and their drivers as JSON text (malloc'ed: free it with
// pyllama_free_string): [{"index", "device_name", "api_version", "min_storage_buffer_offset_alignment",
// "driver_id", "driver_name", "driver_info"}]. NULL when this build has no Vulkan support, no loader
// is installed, or no instance could be created.
PYLLAMA_COMMON_API char * pyllama_vulkan_drivers(void) {
#if defined(PYLLAMA_VULKAN_HEADERS) && !defined(_WIN32)
    try {
        std::string text = query();
        if (text.empty()) {
            return nullptr;
        }
        char * s = static_cast<char *>(std::malloc(text.size() + 1));
        if (s) {
            std::memcpy(s, text.c_str(), text.size() + 1);
        }
        return s;
    } catch (...) {
        return nullptr;
    }
#else
    return nullptr;
#endif
}
