# What every ds3 native addon (packages/backend-cpu, -cuda, -rocm, -ascend) sets up the same way, included
# by each CMakeLists.txt right after project():
#   C++17, Release unless told, the Node-API version and C++ exceptions, and where node-addon-api's headers
#   (NODE_ADDON_API_DIR) and node's own (CMAKE_JS_INC, set by cmake-js) are;
#   ds3_napi_addon(<target> [STATIC_RUNTIME]) after add_library(): a <target>.node that includes and links
#   them; STATIC_RUNTIME links libstdc++ and libgcc statically (g++), for a .node carried to other machines.
# An addon that converts every C++ exception to a JS error adds -DNODE_ADDON_API_CPP_EXCEPTIONS_ALL itself.
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
if(NOT CMAKE_BUILD_TYPE)
  set(CMAKE_BUILD_TYPE Release)
endif()
add_definitions(-DNAPI_VERSION=8 -DNODE_ADDON_API_DISABLE_DEPRECATED -DNAPI_CPP_EXCEPTIONS)

# node-addon-api headers (found through node, so no download is ever needed). On a GPU machine without
# node_modules (bench/cuda/build-device.sh): DS3_NAPI_INCLUDE names napi.h's folder and
# DS3_NODE_API_INCLUDE node_api.h's (.device/include/node from ../shared/tools/device-carry.sh).
if(DEFINED ENV{DS3_NAPI_INCLUDE})
  set(NODE_ADDON_API_DIR "$ENV{DS3_NAPI_INCLUDE}")
else()
  execute_process(COMMAND node -p "require('node-addon-api').include_dir"
    WORKING_DIRECTORY ${CMAKE_SOURCE_DIR} OUTPUT_VARIABLE NODE_ADDON_API_DIR OUTPUT_STRIP_TRAILING_WHITESPACE)
  string(REPLACE "\"" "" NODE_ADDON_API_DIR "${NODE_ADDON_API_DIR}")
  if(NOT IS_ABSOLUTE "${NODE_ADDON_API_DIR}")
    set(NODE_ADDON_API_DIR "${CMAKE_SOURCE_DIR}/${NODE_ADDON_API_DIR}")
  endif()
endif()
if(NOT CMAKE_JS_INC AND DEFINED ENV{DS3_NODE_API_INCLUDE})
  set(CMAKE_JS_INC "$ENV{DS3_NODE_API_INCLUDE}")
endif()

function(ds3_napi_addon target)
  cmake_parse_arguments(ARG "STATIC_RUNTIME" "" "" ${ARGN})
  set_target_properties(${target} PROPERTIES PREFIX "" SUFFIX ".node")
  target_include_directories(${target} PRIVATE ${CMAKE_JS_INC} ${NODE_ADDON_API_DIR})
  target_link_libraries(${target} PRIVATE ${CMAKE_JS_LIB})
  if(ARG_STATIC_RUNTIME AND CMAKE_CXX_COMPILER_ID MATCHES "GNU")
    # the .node is carried to other machines: do not depend on their libstdc++
    target_link_options(${target} PRIVATE -static-libstdc++ -static-libgcc)
  endif()
  if(MSVC AND CMAKE_JS_NODELIB_DEF AND CMAKE_JS_NODELIB_TARGET)
    execute_process(COMMAND ${CMAKE_AR} /def:${CMAKE_JS_NODELIB_DEF} /out:${CMAKE_JS_NODELIB_TARGET} ${CMAKE_STATIC_LINKER_FLAGS})
  endif()
endfunction()
